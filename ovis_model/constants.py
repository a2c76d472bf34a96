"""Constants shared with the pack stage (OVIS_V1.md section 3)."""

IGNORE_INDEX = -100  # label of unsupervised positions
IMAGE_TOKEN_ID = -200  # placeholder id of one image in token ids
IMAGE_TOKEN = "<image>"  # image marker in text
