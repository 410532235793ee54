"""``perceive-ir test``: BasicSR testing with the plugin registered (see ``perceive_ir_plugin/test.py``)."""


def add_basicsr_arguments(parser, train):
    """Add BasicSR's ``parse_options`` arguments to ``parser``."""
    parser.add_argument('-opt', '--opt', dest='opt', required=True, help='option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher (pytorch: under torchrun)')
    if train:
        parser.add_argument('--auto_resume', '--auto-resume', dest='auto_resume', action='store_true',
                            help='resume from the newest state in experiments/<name>/training_states')
    parser.add_argument('--debug', action='store_true', help="BasicSR debug mode (name prefixed 'debug_')")
    parser.add_argument('--force_yml', '--force-yml', dest='force_yml', nargs='+', default=None,
                        metavar='KEY=VALUE', help='override existing option keys, e.g. train:ema_decay=0.999')


def to_basicsr_argv(args):
    """Turn the parsed sub-command arguments back into BasicSR's command line."""
    argv = ['-opt', args.opt, '--launcher', args.launcher]
    if getattr(args, 'auto_resume', False):
        argv.append('--auto_resume')
    if args.debug:
        argv.append('--debug')
    if args.force_yml:
        argv += ['--force_yml', *args.force_yml]
    return argv


def run(args):
    """Entry of ``perceive-ir test``; returns the exit code."""
    from perceive_ir_plugin.test import main
    return main(to_basicsr_argv(args))


def add_parser(subparsers):
    """Add the ``test`` sub-command."""
    parser = subparsers.add_parser(
        'test', help='test with BasicSR test_pipeline (results/ under the working directory)',
        description='Run BasicSR 1.4.2 test_pipeline with the plugin registered. results/<name>/ is created '
        'under the current working directory.')
    add_basicsr_arguments(parser, train=False)
    parser.set_defaults(func=run)
