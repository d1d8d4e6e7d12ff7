"""Integrations with Twitch bot libraries: :mod:`kissbot.ext.twitchio` and :mod:`kissbot.ext.twitchapi`."""
