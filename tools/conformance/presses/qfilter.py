"""Q-Filters (kvpress QFilterPress, defaults): kvbench method qfilter. Both sides read the same local filter file
(tests/fixtures/kvpress/qfilters/tiny.safetensors, written by tools/conformance/qfilters_fixture.py with kvbench's
calibration): kvpress's press gets it in place of its hub download (``post_init_from_model`` replaced on the
instance), kvbench through ``method.scorer.filters``."""

FILTERS = "tests/fixtures/kvpress/qfilters/tiny.safetensors"


def cases():
    from safetensors.torch import load_file

    from kvpress.presses.qfilter_press import QFilterPress

    filters = load_file(FILTERS)["q_filters"]

    def factory(cr):
        press = QFilterPress(compression_ratio=cr)

        def post_init_from_model(model):  # kvpress's own: QFilters.from_pretrained(hub id).q_filters.to(dtype)
            press.q_filters = filters.to(model.dtype)

        press.post_init_from_model = post_init_from_model
        return press

    return [{"press": "QFilterPress", "attn": "sdpa", "factory": factory, "method": "qfilter",
             "overrides": {"filters": FILTERS}, "topk": True}]
