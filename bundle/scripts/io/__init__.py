"""Reading and writing: NIfTI (fast gzip), DICOM series, radiographs, case discovery and keys, atomic files."""
