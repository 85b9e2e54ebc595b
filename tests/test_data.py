"""Edit-record formats and EditDataModule: same requests from every format, clear errors for bad records."""

from __future__ import annotations

import json

import pytest

from lit_prune import EditDataModule
from lit_prune.data.formats import detect_format, load_requests, records_to_requests
from lit_prune.requests import EditRequest, EditRequestError, template_from_prompt

ROME_REC = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
}
EASYEDIT_REC = {
    "case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
    "subject": "Danielle Darrieux", "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French",
}
OWN_REC = {
    "case_id": 7, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
    "target_true": "French", "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
}
ZSRE_REC = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
}


def test_counterfact_formats_give_the_same_request():
    reqs = [records_to_requests([r])[0] for r in (ROME_REC, EASYEDIT_REC, OWN_REC)]
    assert [detect_format(r) for r in (ROME_REC, EASYEDIT_REC, OWN_REC, ZSRE_REC)] == [
        "counterfact", "easyedit", "lit_prune", "zsre"]
    assert reqs[0] == reqs[1] == reqs[2]
    assert reqs[0].full_prompt == "The mother tongue of Danielle Darrieux is"


def test_zsre_record():
    r = records_to_requests([ZSRE_REC])[0]
    assert r.prompt == "What is the product made by {}?" and r.target_new == "unmanned aircraft"
    assert r.target_true == "uniform" and r.case_id == 0
    assert r.neighborhood_prompts == ["john goodman's character in the big lebowski"]
    assert r.neighborhood_answers == ["Walter Sobchak"]


def test_template_escapes_braces():
    t = template_from_prompt("A {weird} prompt about Rome is", "Rome")
    assert t.format("Rome") == "A {weird} prompt about Rome is"


def test_shared_data_files_load(data_dir):
    cf = load_requests(data_dir / "counterfact" / "counterfact-edit.json", n=50)
    assert len(cf) == 50 and all(r.subject in r.full_prompt for r in cf)
    zs = load_requests(data_dir / "zsre" / "zsre-1k.json", n=20)
    assert all(r.neighborhood_answers for r in zs)


@pytest.mark.parametrize(
    "record, message",
    [
        ({**OWN_REC, "subject": ""}, r"record 1 \(case_id 7\): field 'subject' is empty"),
        ({k: v for k, v in OWN_REC.items() if k != "subject"}, r"record 1: missing field 'subject'"),
        ({**OWN_REC, "target_new": " "}, r"record 1 \(case_id 7\): field 'target_new' is empty"),
        ({**OWN_REC, "target_new": 3}, r"record 1 \(case_id 7\): field 'target_new' must be a string, got int"),
        ({**OWN_REC, "prompt": "The mother tongue is"}, r"record 1 \(case_id 7\): field 'prompt' must contain exactly one"),
        ({**OWN_REC, "paraphrase_prompts": [1]}, r"record 1 \(case_id 7\): field 'paraphrase_prompts' must be a list of strings"),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, record, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([OWN_REC, record]))
    with pytest.raises(EditRequestError, match=message) as e:
        EditDataModule(path=str(p))
    assert str(p) in str(e.value)


def test_easyedit_subject_missing_from_prompt(tmp_path):
    p = tmp_path / "ee.json"
    p.write_text(json.dumps([EASYEDIT_REC, {**EASYEDIT_REC, "subject": "Edith Piaf"}]))
    with pytest.raises(EditRequestError, match=r"record 1: field 'prompt': subject 'Edith Piaf' not found"):
        EditDataModule(path=str(p))


def test_datamodule_arguments(tmp_path):
    p = tmp_path / "ok.json"
    p.write_text(json.dumps([OWN_REC, {**OWN_REC, "case_id": 8}]))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        EditDataModule(path=str(p), batch_size=0)
    with pytest.raises(EditRequestError, match="n_edits=3 but .*ok.json has only 2 records"):
        EditDataModule(path=str(p), n_edits=3)
    with pytest.raises(EditRequestError, match="unknown format 'rome'"):
        EditDataModule(path=str(p), format="rome")
    with pytest.raises(EditRequestError, match="edit data file not found"):
        EditDataModule(path=str(tmp_path / "missing.json"))


def test_order_batches_and_seeded_shuffle(tmp_path):
    recs = [{**OWN_REC, "case_id": i} for i in range(7)]
    p = tmp_path / "seven.json"
    p.write_text(json.dumps(recs))
    dm = EditDataModule(path=str(p), batch_size=3)
    batches = list(dm.train_dataloader())
    assert [[r.case_id for r in b] for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    a = [r.case_id for r in EditDataModule(path=str(p), shuffle=True, seed=1).requests]
    b = [r.case_id for r in EditDataModule(path=str(p), shuffle=True, seed=1).requests]
    c = [r.case_id for r in EditDataModule(path=str(p), shuffle=True, seed=2).requests]
    assert a == b and sorted(a) == list(range(7)) and a != list(range(7)) and a != c
    assert [r.case_id for r in EditDataModule(path=str(p), shuffle=True, seed=1, n_edits=3).requests] == a[:3]


def test_request_coerce_errors():
    with pytest.raises(EditRequestError, match=r"request 0: unknown field\(s\) \['objet'\]"):
        EditRequest.coerce({**OWN_REC, "objet": 1}, "request 0")
    r = EditRequest.coerce({"prompt": "{} plays", "subject": "Messi", "target_new": "tennis"})
    assert r.full_prompt == "Messi plays" and r.target_true is None


@pytest.mark.filterwarnings("ignore:EditDataModule. skipped")  # asserted once below, then expected
def test_zsre_records_that_cannot_be_edited_are_refused_or_skipped(data_dir):
    """Some records of the ZsRE sample have alt == answers[0] or an empty alt: refused by default (naming the first
    and the option), left out with skip_invalid, n_edits then counting the records kept."""
    import json

    from lit_prune import EditDataModule
    from lit_prune.requests import EditRequestError

    path = data_dir / "zsre" / "zsre-1k.json"
    raw = json.loads(path.read_text())
    bad = [i for i, r in enumerate(raw) if not r["alt"].strip() or r["alt"].strip() == r["answers"][0].strip()]
    assert bad  # the sample really has such records
    with pytest.raises(EditRequestError, match=rf"record {bad[0]}\b.*--data.skip_invalid true"):
        EditDataModule(path=str(path), n_edits=bad[0] + 1)
    with pytest.warns(UserWarning, match=rf"skipped {len(bad)} record\(s\).*records \[{bad[0]}, "):
        dm = EditDataModule(path=str(path), skip_invalid=True)
    assert len(dm.requests) == len(raw) - len(bad)
    assert not {r.case_id for r in dm.requests} & set(bad)
    dm = EditDataModule(path=str(path), skip_invalid=True, n_edits=bad[0] + 1)
    assert len(dm.requests) == bad[0] + 1 and dm.requests[-1].case_id == bad[0] + 1  # the next record took its place
