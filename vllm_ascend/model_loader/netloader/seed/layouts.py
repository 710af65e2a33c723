"""What a seed serves in each layout (loaded, processed), or why it does not."""

from dataclasses import dataclass

from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
from vllm_ascend.model_loader.netloader.wire.messages import PROCESSED


@dataclass(frozen=True)
class Layouts:
    """What a seed serves in each layout (``layout``), or why it does not."""

    loaded: LoadedWeights | None
    processed: LoadedWeights | None = None
    # The processed model's ``layout.state_signature``, which clients check theirs against.
    signature: str | None = None
    # Why a layout is not served (operators read it in ``info``; clients in a refusal).
    not_loaded: str = "this seed holds the processed layout only"
    not_processed: str = "this seed serves the loaded layout only"

    def weights(self, layout: str) -> LoadedWeights | None:
        return self.processed if layout == PROCESSED else self.loaded

    def why_not(self, layout: str) -> str:
        return self.not_processed if layout == PROCESSED else self.not_loaded

    @property
    def primary(self) -> LoadedWeights:
        """The loaded layout if it is served whole (its value fingerprint is comparable
        with a disk load's on any platform), else the processed one."""
        loaded = self.loaded if self.loaded is not None and not self.loaded.dropped else None
        weights = loaded if loaded is not None or self.processed is None else self.processed
        weights = weights if weights is not None else self.loaded
        assert weights is not None, "a seed serves at least one layout"
        return weights
