"""Checking dataset option keys: misspellings of known keys are errors, other extras are logged."""
import difflib

from basicsr.utils import get_root_logger
from perceive_ir_plugin.utils.option_check import DATALOADER_KEYS, MODEL_DATASET_KEYS

# Keys that BasicSR (or its dataloader builder) puts in or reads from a dataset section, the keys the
# models read there, and keys BasicSR's own datasets read that a plugin dataset harmlessly ignores.
BASICSR_DATASET_KEYS = frozenset(DATALOADER_KEYS | MODEL_DATASET_KEYS | {'color', 'mean', 'std', 'filename_tmpl'})


def check_dataset_keys(opt, own_keys, dataset_type):
    """Raise on a key that looks like a misspelt ``own_keys`` entry; log other unknown keys.

    Args:
        opt (dict): The dataset option section.
        own_keys (Iterable[str]): Keys the dataset understands.
        dataset_type (str): Class name, for messages.
    """
    own = set(own_keys)
    known = own | BASICSR_DATASET_KEYS
    for key in opt:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(own), n=1, cutoff=0.75)
        if close:
            raise ValueError(f"Unknown option key '{key}' in the {dataset_type} dataset section; "
                           f"did you mean '{close[0]}'?")
        get_root_logger().warning(f"{dataset_type}: option key '{key}' is not used by this dataset")
