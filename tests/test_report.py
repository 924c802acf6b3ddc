import pandas as pd

from pipeline.inference.report import age_bin


def test_age_bins_come_from_the_config_and_the_last_is_open_ended():
    ages = pd.Series([0.0, 9.5, 10, 29, 30, 116], name="age_true")
    bins = age_bin(ages, [0, 10, 30])
    assert list(bins.cat.categories) == ["0-9", "10-29", "30+"]
    assert bins.astype(str).tolist() == ["0-9", "0-9", "10-29", "10-29", "30+", "30+"]
    assert age_bin(ages, [0, 18]).astype(str).tolist() == ["0-17"] * 3 + ["18+"] * 3
