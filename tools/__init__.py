"""Tools around the bundle (toy data, phantoms, previews, the demo, HTML reports); not part of the bundle itself."""
