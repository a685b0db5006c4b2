"""What `fleet models` says about custom-op libraries: which models need native code, and whether
the fleet's config (or --config, without a fleet) pins each library by its sha256."""

from __future__ import annotations

from cluster.config import load_config


def trusted_pins(fleet, config_path: str | None) -> tuple[dict[str, tuple[str, ...]], str]:
    """(each model's pinned sha256 digests, whose config says so)."""
    if fleet is not None:
        pins = fleet.info.get("trusted_sha256", {})
        return {m: tuple(p) for m, p in pins.items()}, "the running fleet's config"
    return load_config(config_path).trusted_pins(), "--config"


def print_custom_ops(arts, fleet, config_path: str | None) -> None:
    needing = sorted({(a.manifest.model, lib) for a in arts for lib in a.manifest.custom_ops},
                     key=lambda pair: (pair[0], pair[1].file_name))
    if not needing:
        return
    pins, whose = trusted_pins(fleet, config_path)
    print(f"\ncustom ops (native code that runs in the workers; pinned as {whose} says):")
    for model, library in needing:
        verdict = "trusted" if library.sha256 in pins.get(model, ()) else \
            f"NOT trusted: loads refused until models.{model}.trusted_sha256 lists {library.sha256}"
        print(f"  {model:<20} {library.describe():<70} {verdict}")
