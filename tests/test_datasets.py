"""Where evaluation and calibration text come from (qspec_jax/datasets.py): the GPTQ calibration
reads ShareGPT records from CALIBRATION_SKIP on, and no measured number may be computed on them."""

from qspec_jax import datasets


def test_calibration_records_are_a_known_range_past_the_evaluation_text():
    evaluation = datasets.sharegpt_text_records(8)
    calibration = datasets.sharegpt_text_records(16, skip=datasets.CALIBRATION_SKIP)
    assert [t for _, t in evaluation] == datasets.sharegpt_texts(8)
    assert [t for _, t in calibration] == datasets.sharegpt_calibration_texts(16)
    assert max(i for i, _ in evaluation) < datasets.CALIBRATION_SKIP <= min(i for i, _ in calibration)
    assert datasets.calibration_end(16) == calibration[-1][0] + 1
    # Each text is its record's turns joined: the record index really names the text.
    records = list(datasets.sharegpt_conversations())
    for i, text in calibration[:3]:
        turns = [t["value"] for t in records[i]["conversations"] if t.get("value")]
        assert text == "\n\n".join(turns) and len(text) >= 1500
