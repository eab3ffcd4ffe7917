"""How numbers, times and day ranges are said in each language, from the pack's [format].

Pure functions: the plural category of a number comes from CLDR via babel, the
words from the pack, so a new language needs a pack entry, not code.
"""

from __future__ import annotations

import datetime as dt

from babel import Locale

from .hours import WorkingHours
from .menus import Format, Pack


def plural_form(fmt: Format, forms: dict[str, str], n: int) -> str:
    """The word of ``forms`` (CLDR categories: one, few, many, other...) that goes with ``n``."""
    category = Locale.parse(fmt.locale).plural_form(n)
    return forms.get(category, forms.get("other", ""))


def say_time(pack: Pack, t: dt.time) -> str:
    """A clock time as the pack's TTS voice should read it ("9 a.m.", "9 часов", "9시")."""
    fmt = pack.format
    h12 = t.hour % 12 or 12
    values = {
        "h": fmt.hour_words[t.hour] if fmt.hour_words else t.hour,
        "h12": h12,
        "m": t.minute,
        "ampm": fmt.am if t.hour < 12 else fmt.pm,
        "hour_word": plural_form(fmt, fmt.hour_word, t.hour),
        "minute_word": plural_form(fmt, fmt.minute_word, t.minute),
    }
    template = fmt.time if t.minute == 0 else fmt.time_minutes
    return " ".join(template.format(**values).split())


def say_days(pack: Pack, days: list[int]) -> str:
    """Working days: a range when they run on ("Monday to Friday"), else a list."""
    fmt = pack.format
    if not days:
        return ""
    days = sorted(days)
    if len(days) > 1 and days == list(range(days[0], days[-1] + 1)):
        return fmt.day_range.format(**{"from": fmt.day_from[days[0]], "to": fmt.day_to[days[-1]]})
    names = fmt.day_names or fmt.day_to
    return fmt.list_separator.join(names[d] for d in days)


def say_hours(pack: Pack, hours: WorkingHours) -> str:
    """The pack's ``hours`` prompt filled with the configured working hours."""
    return pack.text(
        "hours",
        days=say_days(pack, hours.working_days()),
        open=say_time(pack, hours.open),
        close=say_time(pack, hours.close),
    )


def say_date(pack: Pack, date: dt.date, today: dt.date | None = None) -> str:
    """A date as the pack's voice should say it: the month name from CLDR in the form a date
    takes (babel: "ноября", "noyabr", "11월"), the day as a word where the pack gives them
    (ordinals, Russian genitive), the year only when it is not the current one."""
    from babel.dates import format_date

    fmt = pack.format
    month = format_date(date, "MMMM", locale=fmt.locale)
    day = fmt.day_words[date.day - 1] if fmt.day_words else str(date.day)
    template = fmt.date if today is not None and today.year == date.year else fmt.date_year
    year: object = date.year
    if fmt.year_words:
        from num2words import num2words

        year = num2words(date.year, lang=pack.language, **dict(fmt.year_words))
    return " ".join(template.format(day=day, month=month, year=year).split())
