"""What `fleet models` says about custom-op libraries: which models need native code, and whether
the fleet's config (or --config, without a fleet) trusts it."""

from __future__ import annotations

from cluster.config import load_config


def trusted_models(fleet, config_path: str | None) -> tuple[set[str], str]:
    """(models whose libraries are trusted, whose config says so)."""
    if fleet is not None:
        return set(fleet.info.get("trust_custom_ops", [])), "the running fleet's config"
    config = load_config(config_path)
    return {m for m, c in config.models.items() if c.trust_custom_ops}, "--config"


def print_custom_ops(arts, fleet, config_path: str | None) -> None:
    needing = sorted({(a.manifest.model, lib) for a in arts for lib in a.manifest.custom_ops},
                     key=lambda pair: (pair[0], pair[1].file_name))
    if not needing:
        return
    trusted, whose = trusted_models(fleet, config_path)
    print(f"\ncustom ops (native code that runs in the workers; trusted as {whose} says):")
    for model, library in needing:
        verdict = "trusted" if model in trusted else f"NOT trusted: loads refused until models.{model}.trust_custom_ops: true"
        print(f"  {model:<20} {library.describe():<70} {verdict}")
