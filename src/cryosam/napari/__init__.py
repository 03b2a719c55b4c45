"""napari plugin: a reader for MRC tomograms and cryosam output folders, and a dock widget
that segments clicked particles and finds similar ones (``pip install -e ".[napari]"``).

The manifest is ``napari.yaml`` beside this file (entry point ``napari.manifest``). Nothing
outside this subpackage imports napari; this ``__init__`` imports nothing either, so napari
can discover the plugin without loading Qt or torch.
"""
