"""Helpers the integration and e2e tests share: a real daemon, real HTTP, a real SSE reader."""
