"""Named settings for the config dataclasses: one `from_preset` rule for all of them.

Each config (LMConfig, HubertConfig, LoRAConfig, VocoderConfig, MelVocoderConfig,
PhoneRecognizerConfig) keeps a dict of presets beside it and builds from it with

    LMConfig.from_preset("toy", vocab_size=1200)   # the preset, these fields replaced

The overrides are applied first and the result is then checked as a whole by the config's own
__post_init__ (a changed dim must still divide into the heads). An unknown preset or field name is
a ValueError that lists the valid ones.
"""
import dataclasses


def config_from_preset(cls, presets, name, overrides):
    """cls(**presets[name], with `overrides` replacing fields); presets: {name: {field: value}}."""
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; valid presets: {', '.join(sorted(presets))}")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; fields: {', '.join(fields)}")
    return cls(**{**presets[name], **overrides})
