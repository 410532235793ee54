"""Task names, ids, noise levels and per-task repeat factors of the all-in-one settings.

The task id is the position in :data:`TASKS` and is what datasets put in ``sample['task']``.
Repeat factors duplicate a task's image list inside one epoch (the official code's
"resampling ratios", SPEC §8.2 and §2.3).
"""
import difflib

TASKS = ('denoise', 'derain', 'dehaze', 'deblur', 'lowlight')
TASK_IDS = {name: idx for idx, name in enumerate(TASKS)}

DEFAULT_SIGMAS = (15, 25, 50)

# Tasks of each setting, in TASKS order.
SETTING_TASKS = {
    '3task': ('denoise', 'derain', 'dehaze'),
    '5task': ('denoise', 'derain', 'dehaze', 'deblur', 'lowlight'),
}

# Repeat factors per setting. '3task'/'5task' are the shipped stage-2 configs (SPEC §8.2: denoise
# 12 = 4 per sigma, dehaze 1, derain 360, deblur 30, low-light 140); 'paper' is the table the official
# code labels as the paper's ratios; 'stage1' is the medium-restorer training of stage 1 (SPEC §2.3).
DEFAULT_REPEATS = {
    '3task': {'denoise': 12, 'derain': 360, 'dehaze': 1},
    '5task': {'denoise': 12, 'derain': 360, 'dehaze': 1, 'deblur': 30, 'lowlight': 140},
    'paper': {'denoise': 3, 'derain': 120, 'dehaze': 1, 'deblur': 5, 'lowlight': 200},
    'stage1': {'denoise': 3, 'derain': 120, 'dehaze': 1, 'deblur': 50, 'lowlight': 40},
}

# Folder names used by the PromptIR / AdaIR / Perceive-IR layouts, for hints in error messages only.
_HINTS = {'enhance': 'lowlight', 'low-light': 'lowlight', 'low_light': 'lowlight', 'lol': 'lowlight',
          'noise': 'denoise', 'denoising': 'denoise', 'rain': 'derain', 'deraining': 'derain',
          'haze': 'dehaze', 'dehazing': 'dehaze', 'blur': 'deblur', 'deblurring': 'deblur'}


def _suggest(name, choices, hints=None):
    key = str(name).strip().lower()
    if hints and key in hints:
        return hints[key]
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return close[0] if close else None


def check_task(name, option_key='task'):
    """Return ``name`` if it is a known task, otherwise raise with the closest suggestion.

    Args:
        name (str): Task name, one of :data:`TASKS`.
        option_key (str): Option key named in the error message.

    Returns:
        str: The task name.

    Raises:
        ValueError: Unknown task, e.g. ``Unknown task 'dehase' in option 'tasks'; did you mean
            'dehaze'? Known tasks: denoise, derain, dehaze, deblur, lowlight``.
    """
    if name in TASK_IDS:
        return name
    hint = _suggest(name, TASKS, _HINTS)
    did_you_mean = f"; did you mean '{hint}'?" if hint else '.'
    raise ValueError(f"Unknown task {name!r} in option '{option_key}'{did_you_mean} "
                     f"Known tasks: {', '.join(TASKS)}")


def task_id(name):
    """Index of ``name`` in :data:`TASKS` (raises like :func:`check_task`)."""
    return TASK_IDS[check_task(name)]


def check_setting(setting, option_key='setting'):
    """Return ``setting`` if it has default repeat factors, otherwise raise with a suggestion."""
    if setting in DEFAULT_REPEATS:
        return setting
    hint = _suggest(setting, DEFAULT_REPEATS)
    did_you_mean = f"; did you mean '{hint}'?" if hint else '.'
    raise ValueError(f"Unknown setting {setting!r} in option '{option_key}'{did_you_mean} "
                     f"Known settings: {', '.join(DEFAULT_REPEATS)}")


def resolve_task_repeats(tasks=None, setting='3task'):
    """Turn the ``tasks`` / ``setting`` options into an ordered ``{task: repeat}`` dict.

    Args:
        tasks (None | str | list[str] | dict[str, int]): ``None`` takes the setting's tasks; a list
            takes those tasks with the setting's repeat factors (a task the setting does not list
            gets the ``'5task'`` factor, then 1); a dict gives explicit repeats.
        setting (str): Key of :data:`DEFAULT_REPEATS`.

    Returns:
        dict[str, int]: Repeat factor per task, in :data:`TASKS` order.
    """
    setting = check_setting(setting)
    defaults = DEFAULT_REPEATS[setting]
    if tasks is None:
        names = SETTING_TASKS.get(setting, tuple(defaults))
        chosen = {t: defaults[t] for t in names}
    elif isinstance(tasks, str):
        chosen = {check_task(tasks, 'tasks'): None}
    elif isinstance(tasks, dict):
        chosen = {check_task(t, 'tasks'): r for t, r in tasks.items()}
    else:
        chosen = {check_task(t, 'tasks'): None for t in tasks}
    out = {}
    for name in TASKS:
        if name not in chosen:
            continue
        rep = chosen[name]
        if rep is None:
            rep = defaults.get(name, DEFAULT_REPEATS['5task'].get(name, 1))
        if isinstance(rep, bool) or not isinstance(rep, int) or rep < 1:
            raise ValueError(f"Repeat factor of task '{name}' in option 'tasks' must be an integer >= 1, "
                             f'got {rep!r}')
        out[name] = rep
    if not out:
        raise ValueError("Option 'tasks' selects no task.")
    return out
