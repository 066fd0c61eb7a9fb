"""The bundle's code (MONAI bundle convention: ``configs/`` refer to it as ``scripts``). Importing it makes nibabel
read and write ``.nii.gz`` through ISA-L (:mod:`scripts.niftiio`; ``MOOD_FAST_GZIP=0`` keeps nibabel's gzip)."""

from scripts.niftiio import use_fast_gzip_unless_disabled

use_fast_gzip_unless_disabled()
