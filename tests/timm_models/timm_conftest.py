"""Run timm's own model tests (its tests/test_models.py, fetched by `make test-timm`, not vendored) on
llamavit's classifiers, treated as timm treats its ViT families.

`make test-timm` copies this file as conftest.py beside timm's file (here it is named so that the project's
own test run does not load it). `fetch.py` puts timm's file there with llamavit's name patterns added to
timm's NON_STD_FILTERS and llamavit's registry module to FEAT_INTER_FILTERS (the lists timm keeps for its
ViTs). This conftest
imports llamavit first (so its names are in timm's registry when the file lists models) and keeps only the
tests of llamavit classifiers below 1B parameters: DiT models are generators (forward(x, t, y)), not
classifiers. TorchScript and torch.fx tests are left out: llamavit targets eager, torch.compile and
torch.export (TorchScript is deprecated in PyTorch 2.x), as the docs say (docs/timm.md).
"""
import fnmatch

import pytest

import llamavit  # noqa: F401  (registers llamavit's models with timm before test_models.py is collected)

LARGE = ("aim_1b_*", "aim_3b_*", "aim_7b_*")
NOT_CLASSIFIERS = ("dit_*",)
LEFT_OUT_TESTS = ("torchscript", "_fx")
# timm's backward test wants a gradient in EVERY parameter; AIM's official trunk keeps a post-trunk norm whose
# output the classifier discards (apple/ml-aim: the probe averages the block outputs), as ours does
EXPECTED_FAILURES = {
    ("test_model_backward", "aim_*"): "AIM's post-trunk norm is unused by the official classifier (it is the "
                                      "pre-training decoder's input norm)",
    ("test_model_backward", "vit_*"): "the frozen LLM block is frozen by design (the paper's method): its parameters "
                                      "get no gradient",
}


def llamavit_classifier(name: str) -> bool:
    return name in llamavit.list_models() and not any(fnmatch.fnmatch(name, p) for p in LARGE + NOT_CLASSIFIERS)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        ok = name is not None and llamavit_classifier(name) and not any(t in item.originalname for t in LEFT_OUT_TESTS)
        (keep if ok else drop).append(item)
        for (test, pattern), reason in EXPECTED_FAILURES.items():
            if ok and item.originalname == test and fnmatch.fnmatch(name, pattern):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
