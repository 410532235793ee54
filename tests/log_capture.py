"""Test helper: collect what BasicSR logs while a block runs."""
import logging


class Capture(logging.Handler):
    """Collects the messages of BasicSR's ``basicsr`` logger, which does not propagate.

    BasicSR sets the logger's level only when it is first made with a log file; another test
    in the same process may have made it without one (level NOTSET -> WARNING), so INFO is
    set for the block and restored after.
    """

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger('basicsr')
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger('basicsr')
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def text(self):
        """All messages so far, one per line."""
        return '\n'.join(self.lines)
