"""``dpo.loss`` in the config: the three forms, the older flat keys, the resolved parameters, and one
clear error naming the key for each bad config."""

from __future__ import annotations

import pytest

from preftune import loss_terms
from preftune.config import ConfigError
from preftune.config.validate import config_from_dict, resolved_dict
from preftune.losses import CPOParams, KTOParams, NoParams, SigmoidParams, SimPOParams


def dpo(**block):
    return config_from_dict({"dpo": block}).dpo


def problems(**block) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dpo": block})
    assert len(e.value.problems) == 1, e.value.problems  # one clear error
    return e.value.problems[0]


def test_the_three_forms():
    """A name; a name with parameters (the shared dpo.beta fills a beta the entry does not set); a list
    with weights; TRL's names with dpo.loss_weights."""
    assert [(t.name, t.weight) for t in loss_terms.terms(dpo(loss="sigmoid"))] == [("sigmoid", 1.0)]
    (simpo,) = loss_terms.terms(dpo(loss={"name": "simpo", "beta": 2.0, "gamma": 0.5}))
    assert simpo.params == SimPOParams(beta=2.0, gamma=0.5)
    terms = loss_terms.terms(dpo(loss=[{"name": "sigmoid", "weight": 0.8}, {"name": "sft", "weight": 0.2}], beta=0.3))
    assert [(t.name, t.weight) for t in terms] == [("sigmoid", 0.8), ("sft", 0.2)]
    assert terms[0].params == SigmoidParams(beta=0.3) and terms[1].params == NoParams()
    terms = loss_terms.terms(dpo(loss=["sigmoid", "cpo"], loss_weights=[1, 0.5]))
    assert [t.weight for t in terms] == [1.0, 0.5] and terms[1].params == CPOParams()
    assert loss_terms.loss_name(dpo(loss=["sigmoid", "sft"])) == "sigmoid+sft"


def test_older_flat_keys_keep_working():
    """dpo.gamma / label_smoothing / ipo_normalize / orpo_lambda fill the parameter of that name;
    sft_weight appends an sft term; saved configs carry the old defaults for every loss, which a loss
    without that parameter ignores."""
    (t,) = loss_terms.terms(dpo(loss="simpo", beta=2.0, gamma=1.0, label_smoothing=0.1))
    assert t.params == SimPOParams(beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert loss_terms.terms(dpo(loss="orpo", orpo_lambda=0.3))[0].params.lambda_ == 0.3
    assert loss_terms.terms(dpo(loss="ipo", ipo_normalize="sum"))[0].params.normalize == "sum"
    terms = loss_terms.terms(dpo(loss="sigmoid", sft_weight=0.5))
    assert [(t.name, t.weight) for t in terms] == [("sigmoid", 1.0), ("sft", 0.5)]
    saved = dict(loss="hinge", label_smoothing=0.0, ipo_normalize="mean", gamma=0.5, orpo_lambda=0.1, sft_weight=0.0)
    assert [t.name for t in loss_terms.terms(dpo(**saved))] == ["hinge"]


def test_config_show_form_is_resolved_and_loads_back():
    """resolved_dict (what `preftune config show` prints) holds every parameter, the flat keys folded in;
    it loads back to the same terms."""
    cfg = config_from_dict({"dpo": {"loss": "simpo", "beta": 2.0, "gamma": 1.0, "sft_weight": 0.5}})
    out = resolved_dict(cfg)["dpo"]
    assert out["loss"] == [
        {"name": "simpo", "weight": 1.0, "beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0},
        {"name": "sft", "weight": 0.5},
    ]
    assert out["gamma"] is None and out["sft_weight"] is None
    assert loss_terms.terms(config_from_dict({"dpo": out}).dpo) == loss_terms.terms(cfg.dpo)


def test_unknown_loss_names_the_key_with_did_you_mean():
    msg = problems(loss="sigmod")
    assert msg.startswith("dpo.loss: unknown loss 'sigmod' (did you mean 'sigmoid'?)") and "kto" in msg
    assert problems(loss=[{"name": "sigmoid"}, {"name": "kot"}]).startswith("dpo.loss[1]: unknown loss 'kot'")
    assert "needs a name" in problems(loss={"beta": 0.1})


def test_unknown_parameter_names_the_loss_and_its_parameters():
    msg = problems(loss={"name": "simpo", "gama": 0.5})
    assert msg == ("dpo.loss.gama: loss 'simpo' has no parameter 'gama' (did you mean 'gamma'?); "
                   "its parameters: beta, gamma, label_smoothing")
    assert problems(loss="sigmoid", gamma=1.0).startswith("dpo.gamma: no loss in dpo.loss (sigmoid) has the parameter")
    assert problems(loss={"name": "ipo", "normalize": "avg"}).startswith("dpo.loss.normalize: 'avg' is not one of")
    assert problems(loss={"name": "exo_pair", "label_smoothing": 0.0}).startswith("dpo.loss.label_smoothing:")


def test_weights_that_do_not_match_the_losses():
    assert problems(loss=["sigmoid", "sft"], loss_weights=[1.0]).startswith(
        "dpo.loss_weights: 1 weight(s) for 2 loss(es)")
    assert problems(loss=[{"name": "sigmoid", "weight": 1}, "sft"], loss_weights=[1, 2]).startswith(
        "dpo.loss[0].weight: set both")
    assert "mixes unpaired losses" in problems(loss=["kto", "sigmoid"])


def test_kto_on_paired_data_needs_the_split_option():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dpo": {"loss": "kto"}, "data": {"format": "hh"}})
    assert e.value.problems == [
        "dpo.unpair: kto reads unpaired rows but data.format is 'hh' (pairs); set dpo.unpair=true to split each "
        "pair into a desirable and an undesirable row, or use kto data"]
    cfg = config_from_dict({"dpo": {"loss": {"name": "kto", "desirable_weight": 1.5}, "unpair": True},
                            "data": {"format": "hh"}})
    assert loss_terms.terms(cfg.dpo)[0].params == KTOParams(desirable_weight=1.5) and loss_terms.unpaired(cfg.dpo)
    assert problems(loss="sigmoid", unpair=True).startswith("dpo.unpair: only for the unpaired losses")
    assert problems(loss="kto", unpair=True, ld_alpha=0.5).startswith("dpo.ld_alpha: works on pairs")


def test_kto_on_paired_data_at_load_time_names_the_key():
    """With data.format auto the data is only known when read: pairs without dpo.unpair stop the run
    naming dpo.unpair."""
    from preftune.data.unpaired import load_unpaired
    from preftune.errors import PreftuneError

    cfg = config_from_dict({"dpo": {"loss": "kto"}})
    with pytest.raises(PreftuneError, match=r"dpo\.unpair: the unpaired losses"):
        load_unpaired(cfg.data, cfg.dpo.unpair, 0)
    train, test, _ = load_unpaired(cfg.data, True, 0)
    assert train and {r.label for r in train} == {True, False}


def test_tr_dpo_with_precomputed_reference_is_an_error():
    for reference in ("precomputed", "auto"):
        msg = problems(sync_ref_model=True, reference=reference)
        assert msg.startswith("dpo.sync_ref_model: TR-DPO updates the reference") and "copy or adapter" in msg
    assert dpo(sync_ref_model=True, reference="copy").sync_ref_model
    assert problems(loss="simpo", sync_ref_model=True).startswith("dpo.sync_ref_model: simpo has no reference")


def test_options_ranges():
    assert problems(ld_alpha=1.5).startswith("dpo.ld_alpha: must be in [0, 1]")
    assert problems(loss="aot", wpo=True).startswith("dpo.wpo: not with aot, whose losses are not per pair")
    assert problems(loss="simpo", reference="copy").startswith("dpo.reference: simpo trains without a reference")
