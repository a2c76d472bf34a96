"""The values the model shares with the data engine, under the names model code uses (defined once, in
ovis_data.constants)."""

from ovis_data.constants import IGNORE_ID as IGNORE_INDEX
from ovis_data.constants import IMAGE_ID as IMAGE_TOKEN_ID
from ovis_data.constants import IMAGE_MARK as IMAGE_TOKEN

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "IMAGE_TOKEN_ID"]
