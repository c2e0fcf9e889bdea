"""The simulated API's model catalog: models, USD-per-million-token prices and the protocols each speaks."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("chat.completions", "responses", "messages", "generateContent")

# The price sheet a record was rated against; real ZenMux bumps this when prices change.
PRICE_VERSION = "v1"

# A model on promotion gets this fraction off each fee item, for roughly this share of its generations.
PROMO_DISCOUNT_RATE = 0.1
PROMO_SHARE = 0.3


@dataclass(frozen=True)
class Model:
    id: str
    prompt_usd_per_m: float
    completion_usd_per_m: float
    cache_read_usd_per_m: float
    protocols: tuple[str, ...]
    # Relative share of traffic; keeps the demo's mix looking like a real fleet (cheap models dominate).
    weight: float
    reasoning: bool = False
    promo: bool = False


# Prices are the providers' public list prices (USD per 1M tokens) at the time of writing.
MODELS: tuple[Model, ...] = (
    Model("anthropic/claude-sonnet-4", 3.0, 15.0, 0.3, ("messages", "chat.completions"), 3.0, reasoning=True),
    Model("anthropic/claude-opus-4", 15.0, 75.0, 1.5, ("messages", "chat.completions"), 0.5, reasoning=True),
    Model("openai/gpt-4.1", 2.0, 8.0, 0.5, ("chat.completions", "responses"), 2.0),
    Model("openai/gpt-4.1-mini", 0.4, 1.6, 0.1, ("chat.completions", "responses"), 4.0, promo=True),
    Model("openai/o4-mini", 1.1, 4.4, 0.275, ("responses", "chat.completions"), 1.0, reasoning=True),
    Model("google/gemini-2.5-pro", 1.25, 10.0, 0.31, ("generateContent", "chat.completions"), 1.5, reasoning=True),
    Model(
        "google/gemini-2.5-flash",
        0.3,
        2.5,
        0.075,
        ("generateContent", "chat.completions"),
        4.0,
        reasoning=True,
        promo=True,
    ),
    Model("deepseek/deepseek-chat", 0.27, 1.1, 0.07, ("chat.completions",), 2.0, promo=True),
)

BY_ID: dict[str, Model] = {m.id: m for m in MODELS}
WEIGHTS: tuple[float, ...] = tuple(m.weight for m in MODELS)


def model(model_id: str) -> Model:
    """The catalog entry for model_id; KeyError if the simulator does not serve it."""
    return BY_ID[model_id]
