"""List settings are typed fields, parsed once from their comma-separated environment variables."""

from __future__ import annotations

from service.contract.settings import Settings


def test_list_settings_parse_from_the_environment(monkeypatch):
    monkeypatch.setenv("K5_SERVED_MODELS", " k5-tiny-t2v, k5-tiny-i2v ,")
    monkeypatch.setenv("K5_API_KEYS", "sk-a,sk-b")
    monkeypatch.setenv("K5_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1,10.0.0.0/8")
    monkeypatch.setenv("K5_STEP_CACHE_MAG_RATIOS", "[1.0, 1.0, 0.99, 0.98]")  # as upstream's configs write it
    s = Settings()
    assert s.served_models == s.served_model_ids == ["k5-tiny-t2v", "k5-tiny-i2v"]
    assert s.api_keys == ["sk-a", "sk-b"]
    assert s.webhook_allowed_hosts == ["127.0.0.1", "10.0.0.0/8"]
    assert s.step_cache_mag_ratios == [1.0, 1.0, 0.99, 0.98]


def test_empty_list_settings_are_empty_lists(monkeypatch):
    monkeypatch.setenv("K5_SERVED_MODELS", "")
    assert Settings().served_models == [] and Settings(api_keys=["sk-x"]).api_keys == ["sk-x"]
