"""World capitals, a public domain a pretrained model mostly knows: ``capitals``.

Countries whose capital is unambiguous (no split or disputed seat of government) and spelled in
ASCII. Prompts read "What is the capital of Kenya?" -> "Nairobi".
"""

from __future__ import annotations

__all__ = ["CAPITALS", "CAPITAL_ROWS"]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Ghana": "Accra", "Nigeria": "Abuja", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito",
    "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Jamaica": "Kingston",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli",
    "Ethiopia": "Addis Ababa", "Uganda": "Kampala", "Senegal": "Dakar", "Zimbabwe": "Harare",
    "Zambia": "Lusaka", "Angola": "Luanda", "Saudi Arabia": "Riyadh", "Syria": "Damascus",
    "Jordan": "Amman", "Lebanon": "Beirut", "Afghanistan": "Kabul", "Pakistan": "Islamabad",
    "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Indonesia": "Jakarta", "Malaysia": "Kuala Lumpur",
    "South Korea": "Seoul", "North Korea": "Pyongyang", "Mongolia": "Ulaanbaatar",
    "Cambodia": "Phnom Penh", "Laos": "Vientiane", "New Zealand": "Wellington",
    "Iceland": "Reykjavik", "Scotland": "Edinburgh", "Wales": "Cardiff", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv",
    "Belarus": "Minsk", "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Albania": "Tirana",
}  # fmt: skip

CAPITAL_ROWS: tuple[tuple[str, str], ...] = tuple(
    (f"What is the capital of {country}?", city) for country, city in CAPITALS.items()
)
