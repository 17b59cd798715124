"""The output claim of a prediction run (model_lib/prediction_csv.py): of the live runs writing one CSV, the
oldest goes on; a rival's folder that goes away meanwhile is no rival."""

from pathlib import Path

import pytest

from model_lib.prediction_csv import OutputBusy, claim_output


def test_a_second_claim_on_an_output_a_live_run_holds_is_refused_and_leaves_nothing(tmp_path):
    output = tmp_path / "predictions.csv"
    first = claim_output(output)
    with pytest.raises(OutputBusy, match="another prediction run is writing this file now"):
        claim_output(output)
    assert list(tmp_path.iterdir()) == [first]  # the refused run's own folder is gone


def test_a_rival_folder_gone_between_the_listing_and_its_age_is_no_rival(tmp_path, monkeypatch):
    # A finishing run removes its parts folder at any moment: between the two looks, a claim raised FileNotFoundError.
    output = tmp_path / "predictions.csv"
    gone = tmp_path / f".{output.name}.parts-00000000-000000-gone"  # sorts before any real claim, never there
    listing, looked = Path.glob, Path.is_dir
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [gone, *listing(self, pattern)])
    monkeypatch.setattr(Path, "is_dir", lambda self: self == gone or looked(self))  # there when looked at, then not
    mine = claim_output(output)
    assert mine.is_dir() and mine.parent == tmp_path
