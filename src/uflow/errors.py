"""The one exception type users see.

Every problem a user can cause (a bad image, an empty folder, a checkpoint from
another version, a diverging training run) is raised as :class:`UFlowError`
with a one-line message naming the file and what is wrong. The CLI prints that
line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UFlowError(Exception):
    """A problem with the user's input, data or environment, explained in one line."""
