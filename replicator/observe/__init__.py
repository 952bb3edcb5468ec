"""Views of the lag model: HTTP (status, metrics, dashboard) and MQTT."""
