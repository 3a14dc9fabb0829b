"""Data: the dataset-folder contract, phantoms, real mammogram I/O, tissue mask, CBIS-DDSM import, patches."""
