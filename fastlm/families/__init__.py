"""One adapter per ``config.model_type``: HF module tree -> fused modules, in place."""
from fastlm.families.arcee import patch_arcee
from fastlm.families.helium import patch_helium
from fastlm.families.persimmon import patch_persimmon
from fastlm.families.stablelm import patch_stablelm

FAMILY_ADAPTERS = {
    "arcee": patch_arcee,
    "stablelm": patch_stablelm,
    "persimmon": patch_persimmon,
    "helium": patch_helium,
}
