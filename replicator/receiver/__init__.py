"""The receiver: sessions with agents, the journal, the applier and the mirror it writes."""
