"""The latency benchmark suite behind ``voicebot bench`` (see benchmarks/README.md).

Modules: ``audio_core`` (frame cost, ASR real-time factor, memory), ``compare`` (VADs,
DTMF detectors), ``sip`` and ``probe`` (turn latency over SIP, capacity through Kamailio),
``suite`` (recognition accuracy suites), ``report`` (Markdown and plots), ``runner``.
"""

from .runner import run_bench

__all__ = ["run_bench"]
