"""The Snapdragon chipsets a bundle can be compiled for (QNN soc_model and Hexagon/HTP arch).

To add a chipset, add a :class:`Chipset` to :data:`CHIPSETS`: its QNN ``soc_model`` and HTP arch
come from Qualcomm's QNN SDK documentation (the ``soc_model`` table of the HTP backend).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_ondevice.core.errors import UserError

DEFAULT_CHIPSET = "snapdragon-8-elite"
#: Weight sharing needs HTP v73 or newer (docs/bundle-format.md).
MIN_WEIGHT_SHARING_ARCH = 73


@dataclass(frozen=True)
class Chipset:
    """A Snapdragon chipset: the name users pass, the QNN soc_model and the Hexagon arch."""

    name: str
    soc_model: int
    arch: int  # HTP / Hexagon version, e.g. 79 for v79
    product: str

    @property
    def dsp_arch(self) -> str:
        return f"v{self.arch}"

    @property
    def weight_sharing(self) -> bool:
        return self.arch >= MIN_WEIGHT_SHARING_ARCH

    def to_dict(self) -> dict:
        return {"chipset": self.name, "soc_model": self.soc_model, "dsp_arch": self.dsp_arch, "product": self.product}


#: Known chipsets. The ones older than v73 are known so that they are refused with the reason.
CHIPSETS: dict[str, Chipset] = {c.name: c for c in (
    Chipset("snapdragon-8-elite", 69, 79, "SM8750"),
    Chipset("snapdragon-8-gen-3", 57, 75, "SM8650"),
    Chipset("snapdragon-8-gen-2", 43, 73, "SM8550"),
    Chipset("snapdragon-x-elite", 60, 73, "SC8380XP"),
    Chipset("snapdragon-8-elite-gen-5", 87, 81, "SM8850"),
    Chipset("snapdragon-8-gen-1", 36, 69, "SM8450"),
)}


def supported_chipsets() -> list[str]:
    return [c.name for c in CHIPSETS.values() if c.weight_sharing]


def resolve_chipset(name: str | None) -> Chipset | None:
    """The chipset called ``name``; None for ``none`` (no compilation).

    Raises:
        UserError: an unknown name (the supported ones are listed), or a chipset older than v73,
            whose HTP cannot share weights between the AR-128 and AR-1 graphs.
    """
    if name is None or name.lower() == "none":
        return None
    chip = CHIPSETS.get(name.lower())
    if chip is None:
        raise UserError(f"unknown chipset {name!r}; supported: {', '.join(supported_chipsets())} (or 'none' to skip compilation)")
    if not chip.weight_sharing:
        raise UserError(
            f"chipset {chip.name} ({chip.product}, HTP {chip.dsp_arch}) is not supported: weight sharing between the "
            f"AR-128 and AR-1 graphs needs HTP v{MIN_WEIGHT_SHARING_ARCH} or newer; supported: {', '.join(supported_chipsets())}"
        )
    return chip


def check_chipset_option(chipset: str | None, precision: str) -> Chipset | None:
    """Validate ``export --chipset`` before any work: the name, and that onnxruntime-qnn is there
    when a quantized bundle is to be compiled. Returns the chipset (None: nothing to compile)."""
    chip = resolve_chipset(chipset)
    if chip is not None and precision in ("w8a16", "w4a16"):
        try:
            import onnxruntime_qnn  # noqa: F401
        except ImportError:
            raise UserError(
                f"compiling for {chip.name} needs the onnxruntime-qnn package (Linux x86_64 or Windows ARM64); "
                "install it or pass --chipset none"
            ) from None
    return chip
