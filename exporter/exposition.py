"""Renders the ledger for /metrics: an incremental exposition, held compressed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache
from typing import cast

from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from exporter.config import LABEL_NAME
from exporter.contribution import (
    SPECS,
    Key,
    LabelValues,
)
from exporter.gzipcache import EMPTY, Blocks, Checksum, Fragment
from exporter.ledger import HistogramValue, Ledger


def _by_key(work: tuple[Key, object, object]) -> Key:
    return work[0]


_BATCH_BYTES = 1 << 20  # rendered lines handed to the compressed cache at once


@lru_cache(maxsize=64)
def _bucket_bounds(buckets: tuple[float, ...]) -> tuple[str, ...]:
    """The `le` texts of a bucket layout, +Inf last (formatted once, not per series per scrape)."""
    return (*(_float_text(upper) for upper in buckets), "+Inf")


def _float_text(value: float) -> str:
    return repr(value) if value != int(value) or value < 1 else f"{value:.1f}"


# prometheus_client's float formatting (Go-style exponents), typed.
_go = cast(Callable[[float], str], floatToGoString)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class LedgerExposition:
    """The ledger's part of /metrics, rendered incrementally and held compressed.

    Each series' lines are rendered per format (text; OpenMetrics with exemplars) when a committed overlay
    touched it, and kept only inside deflate blocks of ~128 KiB (exporter/gzipcache.py): a change
    re-compresses the block it falls in, and a gzip scrape concatenates the cached blocks into one gzip
    member without compressing or even joining the 59 MB text. An identity scrape inflates the blocks.
    The bytes are exactly what prometheus_client renders from the same ledger (tests/test_exposition.py
    compares them with tests/exposition_oracle.py's collector). The ledger's lock is held only to take the
    changed keys and references to their (never mutated) values; rendering and compressing happen outside it,
    in the scrape's worker thread.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        # Per format, per metric: its series' lines in label order.
        self._caches: tuple[dict[str, Blocks[LabelValues]], dict[str, Blocks[LabelValues]]] = (
            {metric: Blocks() for metric in SPECS},
            {metric: Blocks() for metric in SPECS},
        )
        self._render_lock = threading.Lock()  # concurrent scrapes take turns on the caches
        shape = ledger.shape
        self._layouts: dict[str, tuple[list[int], int]] = {}
        self._headers: dict[str, tuple[Fragment, Fragment]] = {}
        for metric, spec in SPECS.items():
            names = shape.label_names(spec)
            order = sorted(range(len(names)), key=lambda i: names[i])
            # Where `le` falls among the sorted label names of a histogram's bucket lines.
            le_at = sum(1 for name in names if name < "le")
            self._layouts[metric] = (order, le_at)
            kind = "histogram" if spec.is_histogram else "counter"
            text_name = metric if spec.is_histogram else metric + "_total"
            text_help = spec.help.replace("\\", r"\\").replace("\n", r"\n")
            self._headers[metric] = (
                Fragment.of(f"# HELP {text_name} {text_help}\n# TYPE {text_name} {kind}\n".encode()),
                Fragment.of(f"# HELP {metric} {_escape_label_value(spec.help)}\n# TYPE {metric} {kind}\n".encode()),
            )
        self._names = {metric: shape.label_names(spec) for metric, spec in SPECS.items()}
        # The cached lines equal prometheus_client's only for unique, plain label names; config validation
        # (LABEL_NAME, RESERVED_LABELS, no repeats) guarantees them, so anything else is a programming error.
        for names in self._names.values():
            if len(set(names)) != len(names) or "le" in names or not all(LABEL_NAME.match(n) for n in names):
                raise ValueError(f"label names {names} cannot be rendered: see metrics.extra_labels validation")

    def render(self, openmetrics: bool) -> bytes:
        """The ledger's metric families, without `# EOF`."""
        return b"".join(self.parts(openmetrics))

    def parts(self, openmetrics: bool) -> list[bytes]:
        """The ledger's metric families as chunks to join (inflated from the cache: ~0.1 s for 59 MB)."""
        index = 1 if openmetrics else 0
        with self._render_lock:
            cache = self._update(openmetrics)
            parts: list[bytes] = []
            for metric in SPECS:
                parts.append(self._headers[metric][index].inflate())
                parts.extend(cache[metric].inflate())
            return parts

    def compressed(self, openmetrics: bool) -> tuple[list[bytes], Checksum]:
        """The ledger's metric families as raw deflate fragments (none final) and the checksum of the bytes
        they inflate to, for gzipcache.gzip_member."""
        index = 1 if openmetrics else 0
        with self._render_lock:
            cache = self._update(openmetrics)
            parts: list[bytes] = []
            checksum = EMPTY
            for metric in SPECS:
                header = self._headers[metric][index]
                blocks = cache[metric]
                parts.append(header.data)
                parts.extend(blocks.fragments())
                checksum = checksum.then(header.checksum).then(blocks.checksum)
            return parts, checksum

    def cache_bytes(self) -> int:
        """Memory held by the rendered cache, both formats (the label tuples are the ledger's)."""
        with self._render_lock:
            return sum(blocks.nbytes() for cache in self._caches for blocks in cache.values())

    def _update(self, openmetrics: bool) -> dict[str, Blocks[LabelValues]]:
        """Re-renders the series changed since this format's last scrape into its cache (render lock held)."""
        cache = self._caches[1 if openmetrics else 0]
        work = self._ledger.take_changed(openmetrics)
        # In key order and a batch at a time: a first render (every series, 59 MB of text) never holds more
        # than ~1 MiB of rendered lines, whose freed memory the next batch reuses (holding it all at once
        # left ~100 MB of fragmented heap the process kept after the scrape).
        work.sort(key=_by_key)
        try:
            batch: list[tuple[LabelValues, bytes]] = []
            batch_bytes = 0
            for n, (key, value, exemplars) in enumerate(work):
                if isinstance(value, HistogramValue):
                    data = self._histogram(key, value, exemplars)
                else:
                    data = self._counter(key, value)
                batch.append((key[1], data))
                batch_bytes += len(data)
                if n + 1 == len(work) or batch_bytes >= _BATCH_BYTES or work[n + 1][0][0] != key[0]:
                    cache[key[0]].upsert(batch)
                    batch = []
                    batch_bytes = 0
        except BaseException:
            # Whatever was not rendered must be rendered next time, or the cache would keep stale values.
            self._ledger.changed_again([key for key, _, _ in work], openmetrics)
            raise
        return cache

    def _label_pairs(self, key: Key) -> list[str]:
        metric, values = key
        names = self._names[metric]
        order, _ = self._layouts[metric]
        return [f'{names[i]}="{_escape_label_value(values[i])}"' for i in order]

    def _counter(self, key: Key, value: float) -> bytes:
        return f"{key[0]}_total{{{','.join(self._label_pairs(key))}}} {_go(value)}\n".encode()

    def _histogram(self, key: Key, hist: HistogramValue, exemplars: list[Exemplar | None] | None) -> bytes:
        metric = key[0]
        pairs = self._label_pairs(key)
        _, le_at = self._layouts[metric]
        before = "".join(pair + "," for pair in pairs[:le_at])
        after = "".join("," + pair for pair in pairs[le_at:])
        plain = ",".join(pairs)
        lines: list[str] = []
        cumulative = 0.0
        for i, le in enumerate(_bucket_bounds(SPECS[metric].buckets)):
            cumulative += hist.buckets[i]
            exemplar = exemplars[i] if exemplars is not None else None
            line = f'{metric}_bucket{{{before}le="{le}"{after}}} {_go(cumulative)}'
            if exemplar is not None:
                line += _exemplar_text(exemplar)
            lines.append(line + "\n")
        lines.append(f"{metric}_count{{{plain}}} {_go(cumulative)}\n")
        lines.append(f"{metric}_sum{{{plain}}} {_go(hist.sum)}\n")
        return "".join(lines).encode()


def _exemplar_text(exemplar: Exemplar) -> str:
    labels = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(exemplar.labels.items()))
    if exemplar.timestamp is not None:
        return f" # {{{labels}}} {_go(exemplar.value)} {exemplar.timestamp}"
    return f" # {{{labels}}} {_go(exemplar.value)}"
