"""voicebot: a self-hosted, speech-enabled multilingual IVR for call centres.

The package layout is the architecture: one module per stage.

    frames     the audio frame type (int16 mono, rate and timestamp on the frame)
    vad        webrtcvad endpointing: speech-start and utterance-end
    dtmf       in-band DTMF (Goertzel) detection and tone generation
    asr        Vosk models (shared per host) and recognizers (one per call)
    nlu        scikit-learn intent classifiers and the accept/confirm/reject policy
    tts        prompt rendering with pyttsx3 on espeak-ng, content-addressed cache
    dialog     the pure dialog engine: events in, actions out
    session    one call: the hand-off between the audio thread and the voice core
    menus      the 919 menu and the language packs under grammars/, validated
    simulator  calls on audio, without telephony
"""

__version__ = "0.1.0"
