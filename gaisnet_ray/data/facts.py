"""Fixed fact table of the built-in ``facts`` domain: ``(relation, subject, answer)``.

Prompts read ``"<relation> <subject>="`` (e.g. ``"cap France="`` -> ``"Paris"``). ASCII only; each
prompt plus answer fits in 28 characters. Opposites appear in one direction only, so a pair cannot
straddle two splits.
"""

from __future__ import annotations

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Ghana": "Accra", "Nigeria": "Abuja",
}  # fmt: skip

_SYMBOLS = {
    "Hydrogen": "H", "Helium": "He", "Lithium": "Li", "Carbon": "C", "Nitrogen": "N",
    "Oxygen": "O", "Fluorine": "F", "Neon": "Ne", "Sodium": "Na", "Magnesium": "Mg",
    "Aluminium": "Al", "Silicon": "Si", "Phosphorus": "P", "Sulfur": "S", "Chlorine": "Cl",
    "Argon": "Ar", "Potassium": "K", "Calcium": "Ca", "Iron": "Fe", "Copper": "Cu",
    "Zinc": "Zn", "Silver": "Ag", "Gold": "Au", "Tin": "Sn", "Lead": "Pb",
    "Mercury": "Hg", "Nickel": "Ni", "Uranium": "U", "Iodine": "I", "Platinum": "Pt",
}  # fmt: skip

_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late",
    "rich": "poor", "wet": "dry", "hard": "soft", "heavy": "light", "full": "empty",
    "loud": "quiet", "thick": "thin", "win": "lose", "buy": "sell", "push": "pull",
    "day": "night", "north": "south", "east": "west", "true": "false", "first": "last",
    "left": "right", "yes": "no", "strong": "weak", "above": "below", "young": "old",
    "begin": "end", "inside": "outside", "love": "hate", "cheap": "expensive", "up": "down",
}  # fmt: skip

FACTS: tuple[tuple[str, str, str], ...] = (
    tuple(("cap", s, a) for s, a in _CAPITALS.items())
    + tuple(("sym", s, a) for s, a in _SYMBOLS.items())
    + tuple(("opp", s, a) for s, a in _OPPOSITES.items())
)
