import verify_model


def test_base_and_adapter_pass_every_check(demo_model, trained_smoke, capsys):
    assert verify_model.main(["--model", str(demo_model), "--adapter", str(trained_smoke / "final")]) == 0
    out = capsys.readouterr().out
    for check in ("model folder complete", "tokenizer loads",
                  "model loads", "base model generates", "adapter loads onto the base model",
                  "base + adapter generates"):
        assert f"✓ {check}" in out
    assert "✗" not in out and "all checks passed" in out


def test_wrong_folders_fail_with_crosses_and_exit_1(demo_data, tmp_path, capsys):
    assert verify_model.main(["--model", str(demo_data), "--adapter", str(tmp_path / "no-adapter")]) == 1
    out = capsys.readouterr().out
    assert "✗ model folder complete" in out and "no config.json (it looks like a dataset folder)" in out
    assert "✗ adapter files" in out and "Traceback" not in out


def test_checkpoint_folder_without_adapter_weights_fails(demo_model, tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert verify_model.main(["--model", str(demo_model), "--adapter", str(tmp_path)]) == 1
    assert "✗ adapter files" in capsys.readouterr().out
