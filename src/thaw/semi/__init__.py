"""Semi-supervised fine-tuning: FixMatch's loss and settings, the unlabeled stream beside the
labelled loader, and the check that the unlabeled images helped."""

from thaw.semi.callback import WarmupCheck
from thaw.semi.fixmatch import FixMatch, fixmatch_loss

__all__ = ["FixMatch", "WarmupCheck", "fixmatch_loss"]
