"""labutils: the small package every lab imports, one module per concept.

hardware, profile, timing, models, serving, results, launch, dist, plots, roofline,
decode, parallel: see DESIGN.md for what each owns.
"""

__version__ = "0.1.0"
