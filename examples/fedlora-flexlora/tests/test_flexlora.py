"""The plugin passes fedlora's conformance kit."""

from fedlora_flexlora import FlexLora

from fedlora.strategies.conformance import assert_conforms


def test_flexlora_conforms():
    assert_conforms(FlexLora)
