"""Loss terms: how declarations merge, and the messages when examples and declarations disagree."""

import numpy as np
import pytest

from objectives.example import make_example
from objectives.terms import LossTerm, check_extras, merged_terms, term_fields
from pretrain.packing import pack_row

NSP = LossTerm("nsp", head="pair_classifier", fields=(("nsp_labels", -1),))


def example(extras=None):
    return make_example(inputs=np.arange(4), targets=np.arange(4), weights=np.ones(4), positions=np.arange(4),
                        attention_kind=0, token_types=0, objective_id=0, extras=extras)


def test_terms_merge_once_by_name_and_clashes_are_refused():
    assert merged_terms([NSP, NSP]) == (NSP,)
    assert term_fields([NSP]) == {"nsp_labels": -1}
    with pytest.raises(ValueError, match="objectives declare two different loss terms named 'nsp'"):
        merged_terms([NSP, LossTerm("nsp", head="pair_classifier", fields=(("nsp_labels", -1),), weight=2.0)])
    with pytest.raises(ValueError, match=r"loss terms 'nsp' and 'sop' fill field 'nsp_labels' with -1 and 0"):
        merged_terms([NSP, LossTerm("sop", head="pair_classifier", fields=(("nsp_labels", 0),))])
    with pytest.raises(ValueError, match="loss term 'x' reads no field"):
        LossTerm("x", head="pair_classifier", fields=())


def test_extras_must_be_exactly_the_declared_fields():
    check_extras({"nsp_labels": np.full(4, -1, np.int32)}, [NSP], 4, "objective 'mlm'")
    with pytest.raises(ValueError, match=r"objective 'mlm' writes fields \[\] but its loss terms declare "
                                         r"\['nsp_labels'\]"):
        check_extras({}, [NSP], 4, "objective 'mlm'")
    with pytest.raises(ValueError, match=r"field 'nsp_labels' has shape \(3,\), not \(4,\)"):
        check_extras({"nsp_labels": np.zeros(3, np.int32)}, [NSP], 4, "objective 'mlm'")


def test_packing_fills_declared_fields_and_refuses_undeclared_ones():
    labelled = example({"nsp_labels": np.array([1, -1, -1, -1])})
    row = pack_row([example(), labelled], 10, term_fields={"nsp_labels": -1})
    assert row["nsp_labels"].tolist() == [-1, -1, -1, -1, 1, -1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match=r"an example carries fields \['nsp_labels'\] that no loss term of the "
                                         r"packed mixture reads \(declared: \[\]\)"):
        pack_row([labelled], 10)
