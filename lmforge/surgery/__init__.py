"""Surgery: pure, streaming functions from (config, tensors) to (config, tensors); no training happens here.

grow.py (with grow_width.py, grow_depth.py): a larger model initialised from a smaller trained one.
Import the functions from their modules (`from lmforge.surgery.grow import grow, check`): re-exporting
them here would shadow the module `lmforge.surgery.grow` with the function of the same name.
"""
