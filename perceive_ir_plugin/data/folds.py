"""Stable fold ids for cross-fitting (stage 1 trains model k on the samples outside fold k).

SPEC §2.3 / §12: fold = SHA1("task|key") mod n_folds, independent of file order and machine.
"""
import hashlib


def fold_of(task, key, n_folds=2):
    """Fold id of one sample.

    Args:
        task (str): Task name (``'denoise'``, ...).
        key (str): The sample's LMDB key (the same for its LQ and GT records).
        n_folds (int): Number of folds.

    Returns:
        int: ``int(sha1(f"{task}|{key}").hexdigest(), 16) % n_folds``.
    """
    if n_folds < 1:
        raise ValueError(f'n_folds must be >= 1, got {n_folds}')
    digest = hashlib.sha1(f'{task}|{key}'.encode('utf-8')).hexdigest()
    return int(digest, 16) % n_folds
