"""Errors a user can cause. Each message is one sentence: where, what was found, what was expected."""


class WuerstchenError(Exception):
    """Base class for every failure caused by user input (files, sizes, settings, workflows)."""


class CheckpointError(WuerstchenError):
    """A weights file or folder is unreadable, unsafe, or not the component that was asked for."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code, or an unsupported pickle payload."""


class WrongComponentError(CheckpointError):
    """The file is readable but holds another component (e.g. a decoder given to the prior loader)."""


class SizeError(WuerstchenError):
    """An image size outside the supported range."""


class StageMismatchError(WuerstchenError):
    """A latent, conditioning or batch from the wrong stage or of the wrong size."""


class WorkflowError(WuerstchenError):
    """A workflow JSON that names unknown nodes, bad links or wrong widget values."""
