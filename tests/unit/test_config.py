import dataclasses

import pytest

from model_lib.config import ADAM_RECIPE, PROFILES, ConfigError, TrainConfig, resolve_config


def test_seed_profile_is_the_origin_recipe():
    config = resolve_config("seed")
    assert (config.architecture, config.optimizer, config.learning_rate, config.batch_size) == (
        "seed_cnn",
        "adam",
        1e-3,
        64,
    )
    assert (config.validation_split, config.epochs) == (0.2, 100)
    assert (config.early_stopping_patience, config.reduce_lr_patience, config.reduce_lr_factor) == (10, 5, 0.1)
    assert (config.augment_flip, config.augment_rotation, config.augment_zoom) == (True, 0.1, 0.1)
    assert config.label_smoothing == 0 and config.augment_translate == 0 and not config.tta_flip


def test_smoke_profile_sizes():
    config = resolve_config("smoke")
    assert (config.max_train_images, config.max_test_images, config.epochs) == (2000, 1000, 2)


def test_overrides_win_and_none_is_ignored():
    config = resolve_config("seed", epochs=3, batch_size=None)
    assert config.epochs == 3 and config.batch_size == 64 and config.profile == "seed"


def test_unknown_profile_and_field_are_refused():
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_config("nope")
    with pytest.raises(ValueError, match="unknown config field"):
        resolve_config("default", epoch=3)


def test_run_key_depends_on_config_and_data():
    a = resolve_config("smoke")
    assert a.run_key("data1") == resolve_config("smoke").run_key("data1")
    assert a.run_key("data1") != a.run_key("data2")
    assert a.run_key("data1") != resolve_config("smoke", seed=1).run_key("data1")


def test_every_profile_resolves():
    for name in PROFILES:
        assert isinstance(resolve_config(name), TrainConfig)


def test_learning_rates_follow_the_batch_size_unless_given():
    airbench94 = resolve_config("airbench94")
    assert resolve_config("fast").learning_rate == pytest.approx(airbench94.learning_rate / 2)  # batch 256
    assert resolve_config("smoke", batch_size=8).learning_rate == pytest.approx(airbench94.learning_rate * 8 / 512)
    assert resolve_config("smoke", batch_size=8, learning_rate=0.05).learning_rate == 0.05
    assert resolve_config("seed", batch_size=8).learning_rate == 1e-3  # Adam: not scaled
    muon = resolve_config("default")
    quarter = resolve_config("default", batch_size=muon.batch_size // 4)
    assert quarter.learning_rate == pytest.approx(muon.learning_rate / 4)  # Muon's SGD part scales
    assert quarter.muon_learning_rate == pytest.approx(muon.muon_learning_rate / 2)  # its kernel step by the root
    assert resolve_config("default", batch_size=250, muon_learning_rate=0.3).muon_learning_rate == 0.3
    muon_under_airbench94 = resolve_config("airbench94", optimizer="muon")  # Muon's batch and rates, as tuned
    assert (muon_under_airbench94.batch_size, muon_under_airbench94.muon_learning_rate) == (1000, 0.17)


@pytest.mark.parametrize("profile", ["default", "gpu"])
def test_default_and_gpu_train_airbench_with_muon_and_the_other_architectures_with_airbench94s_recipe(profile):
    config = resolve_config(profile)
    assert (config.optimizer, config.tta_translate) == ("muon", True)
    for architecture in ("seed_cnn", "transfer"):
        other = resolve_config(profile, architecture=architecture)
        assert other == dataclasses.replace(resolve_config("airbench94", architecture=architecture), profile=profile)
    # The seed's network and the transfer backbone with the seed's optimiser, the rest of the profile kept;
    # --optimizer overrides it.
    for architecture in ("seed_cnn", "transfer"):
        other = resolve_config(profile, architecture=architecture)
        assert {field: getattr(other, field) for field in ADAM_RECIPE} == ADAM_RECIPE and other.epochs == 10
    assert resolve_config(profile, architecture="seed_cnn", optimizer="sgd") == dataclasses.replace(
        resolve_config("airbench94", architecture="seed_cnn", optimizer="sgd"), profile=profile
    )
    assert resolve_config("seed", architecture="airbench").optimizer == "adam"  # the seed profile is Adam already
    with pytest.raises(ConfigError, match="optimizer muon .* trains the airbench architecture only, not seed_cnn"):
        resolve_config(profile, architecture="seed_cnn", optimizer="muon")


def test_an_optimizer_asked_for_comes_with_its_own_rates_not_the_profiles():
    # --optimizer adam under smoke once kept airbench's SGD rate (0.19) and diverged.
    adam = resolve_config("smoke", optimizer="adam")
    assert {field: getattr(adam, field) for field in ADAM_RECIPE} == ADAM_RECIPE
    assert (adam.batch_size, adam.epochs, adam.max_train_images) == (128, 2, 2000)  # the rest of smoke kept
    assert resolve_config("smoke", optimizer="adam", learning_rate=3e-4).learning_rate == 3e-4
    # SGD asked of the Adam-tuned seed profile: airbench94's rate, scaled to the seed's batch of 64.
    sgd = resolve_config("seed", optimizer="sgd")
    assert sgd.learning_rate == pytest.approx(TrainConfig.learning_rate * 64 / TrainConfig.batch_size)
    assert (sgd.label_smoothing, sgd.lookahead_every) == (TrainConfig.label_smoothing, TrainConfig.lookahead_every)
    # Muon's rates were tuned at default's batch of 1,000: scaled from there to smoke's 128.
    muon, default = resolve_config("smoke", optimizer="muon"), resolve_config("default")
    assert muon.learning_rate == pytest.approx(default.learning_rate * 128 / 1000)
    assert muon.muon_learning_rate == pytest.approx(default.muon_learning_rate * (128 / 1000) ** 0.5)


def test_gpu_is_default_at_twice_the_width_for_half_again_the_epochs():
    default, gpu = resolve_config("default"), resolve_config("gpu")
    assert (default.network_width, default.epochs) == (1.0, 8)
    assert (gpu.network_width, gpu.epochs) == (2.0, 12)
    assert gpu == dataclasses.replace(default, profile="gpu", network_width=2.0, epochs=12)


def test_a_small_folder_holds_out_enough_images_to_calibrate_on_without_emptying_a_class():
    import numpy as np

    from model_lib.config import MIN_VALIDATION_IMAGES
    from model_lib.split import stratified_split

    def held_out(per_class: int, fraction: float) -> int:
        labels = np.repeat(np.arange(10), per_class)
        split = stratified_split(labels, fraction, seed=0, min_held_out=MIN_VALIDATION_IMAGES)
        assert len(np.intersect1d(split.train_index, split.val_index)) == 0
        assert len(split.train_index) + len(split.val_index) == len(labels)
        return len(split.val_index)

    assert held_out(5000, 0.02) == 1000  # CIFAR-10's 50,000: 2% is plenty
    assert held_out(140, 0.02) == 50  # scikit-learn's digits: 30 at 2%, too few to calibrate on
    assert held_out(12, 0.02) == 20  # 12 a class: at most 20% of each, 2 images
    assert held_out(140, 0.0) == 0  # no validation asked for, none taken
