"""The agent: watches datasets on the primary and ships their changes to the receiver."""
