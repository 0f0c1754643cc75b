"""Sizes and durations for people, as the command line shows them (`ps`, `top`, the
memory verbs): "2.1 GiB", "41.2 / 79.6 GiB", "512M", "4m", "4m10s", "-" for unknown.

The one place the client formats them, so that `modelhost ps` and `modelhost top`
read the same. Binary units throughout, as the configuration's sizes are read. The
broker keeps its own (broker/config.py's format_size) because the layering rules
keep it off the client's private modules.

Runs on Python >= 3.7 with the standard library only.
"""

# Largest first: a size is shown in the largest unit it reaches.
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _unit(value):
    """(name, factor) of the largest unit `value` reaches; bytes below a KiB."""
    for unit, factor in _UNITS:
        if value >= factor:
            return unit, factor
    return "B", 1


def size(value):
    """ "512 B", "1.5 KiB", "2.1 GiB" (GiB at most), "-" for None."""
    if value is None:
        return "-"
    return sizes_of([value], value)


def sizes_of(values, of):
    """ "41.2 / 79.6 GiB": several sizes in the unit that suits `of`."""
    unit, factor = _unit(of)
    numbers = ["{:.0f}".format(v) if factor == 1 else "{:.1f}".format(v / float(factor))
               for v in values]
    return "{} {}".format(" / ".join(numbers), unit)


def short_size(value):
    """A size in four or five characters, for a table: "512M", "2.3G", "12G", "-"."""
    if value is None:
        return "-"
    if value < 1024:
        return "{}B".format(int(value))
    if value < 2**20:
        return "{:.0f}K".format(value / 2.0**10)
    if value < 2**30:
        return "{:.0f}M".format(value / 2.0**20)
    if value < 10 * 2**30:
        return "{:.1f}G".format(value / 2.0**30)
    return "{:.0f}G".format(value / 2.0**30)


def footprint(row, key):
    """A daemon's RESIDENT or PEAK (a `ps` row's footprint): "declared/measured" short
    sizes, "-" when neither is known."""
    known = row.get("footprint") or {}
    declared = (known.get("declared") or {}).get(key)
    measured = (known.get("measured") or {}).get(key)
    if declared is None and measured is None:
        return "-"
    return "{}/{}".format(short_size(declared), short_size(measured))


def duration(seconds):
    """How long something has run, coarser as it grows: "42s", "17m", "2h05m"; "-" for None."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return "{}s".format(seconds)
    if seconds < 7200:
        return "{}m".format(seconds // 60)
    return "{}h{:02d}m".format(seconds // 3600, seconds % 3600 // 60)


def countdown(seconds):
    """Time left, to the second while it is short: "42s", "4m10s", "2h05m"."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return "{}s".format(seconds)
    if seconds < 3600:
        return "{}m{:02d}s".format(seconds // 60, seconds % 60)
    return "{}h{:02d}m".format(seconds // 3600, seconds % 3600 // 60)
