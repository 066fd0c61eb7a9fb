"""The bundle's code (MONAI bundle convention: ``configs/`` refer to it as ``scripts``). Importing it makes nibabel
read and write ``.nii.gz`` through ISA-L (:mod:`scripts.io.nifti`; ``MOOD_FAST_GZIP=0`` keeps nibabel's gzip) and
silences two known upstream messages by name (:func:`quiet_known_warnings`)."""

import logging
import warnings

from scripts.io.nifti import use_fast_gzip_unless_disabled

# MONAI's notice that a bundle config is trusted code, printed before any bundle code runs: the wrappers (Makefile,
# run scripts, training's fold processes) set it in PYTHONWARNINGS
MONAI_CONFIG_NOTICE_FILTER = "ignore:parsing config_file:UserWarning:monai.bundle.scripts"


def quiet_known_warnings() -> None:
    """MONAI's ``LoadImage`` instantiates every reader it knows as a fallback; with pydicom installed, its GPU DICOM
    decoder (nvImageCodec, which the bundle does not use) reports that it is missing, twice, on every run."""
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register",
                            category=UserWarning, module="monai.data.image_reader")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


use_fast_gzip_unless_disabled()
quiet_known_warnings()
