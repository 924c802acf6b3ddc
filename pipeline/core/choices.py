"""The names that the config accepts and the code that implements them must agree on. Plain tuples, no imports,
so that the torch-free serving side can check a bundle against them."""

FITS = ("center_crop", "stretch", "pad")  # data.fit: how a non-square image becomes square (data/imaging.py)
AGE_HEADS = ("regression", "dldl", "meanvar", "coral")  # models[].age_head (models/network.py)
TTA_VIEWS = ("none", "hflip", "zoom", "zoom_hflip", "shift_left", "shift_right")  # tta (models/tta.py)
GENDER_METHODS = ("none", "temperature", "platt", "isotonic")  # the rescalings of the gender probability shown
