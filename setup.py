"""Install perceive-ir-plugin.

Besides the package, this installs ``perceive_ir_tv_alias.py`` and the start-up hook
``perceive_ir_tv_alias.pth`` into site-packages so that ``import basicsr`` works on
current torchvision even before the plugin is imported (see that module's docstring).
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = 'perceive_ir_tv_alias.pth'


class BuildPyWithPth(build_py):
    """Copy the ``.pth`` start-up hook next to the top-level modules."""

    def run(self):
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        shutil.copyfile(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


def read_version():
    scope = {}
    with open(os.path.join(HERE, 'perceive_ir_plugin', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), scope)  # noqa: S102 -- our own one-line version file
    return scope['__version__']


setup(
    name='perceive-ir-plugin',
    version=read_version(),
    description='Perceive-IR all-in-one image restoration (quality perception, SGM, CFE) as a BasicSR plugin',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['perceive_ir_plugin', 'perceive_ir_plugin.*']),
    py_modules=['perceive_ir_tv_alias'],
    include_package_data=True,
    package_data={'perceive_ir_plugin': ['configs/*.json', 'configs/*.yml']},
    cmdclass={'build_py': BuildPyWithPth},
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'basicsr==1.4.2',
        'open_clip_torch>=2.20',
        'einops>=0.6',
        'opencv-python>=4.5',
        'lmdb>=1.0',
        'pyyaml>=5.4',
        'scikit-image>=0.19',
        'tqdm',
    ],
    extras_require={'test': ['pytest>=7', 'scikit-learn>=1.0'], 'demo': ['matplotlib>=3.5']},
    entry_points={'console_scripts': ['perceive-ir=perceive_ir_plugin.cli:main']},
)
