"""Training/: mAP@K, the accumulated Ignite metric, checkpoints, resume helpers, flags."""
import argparse
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import average_precision_score

from Training import (CheckpointError, MultiTaskMAPAtK, RNGState, UserError, add_bool_argument, atomic_savetxt,
                      count_parameters, load_checkpoint, make_checkpoints, map_at_k, read_checkpoint,
                      resolve_device, resolve_resume, split_glued_booleans, str2bool)


# ----------------------------------------------------------------------------------------
# mAP@K

def original_map(y_score, y, K):
    """Direct transcription of the original compute_mAP (after the sigmoid): a loop over
    videos taking the top K, dropping videos with no true label among them, sklearn AP
    with average='samples' scaled by kept/total."""
    n = y_score.shape[0]
    topK = np.argsort(y_score, axis=-1)[:, -K:]
    s = np.zeros((n, topK.shape[1]), dtype=np.float32)
    t = np.zeros((n, topK.shape[1]), dtype=np.int32)
    for i in range(n):
        s[i] = y_score[i, topK[i]]
        t[i] = np.asarray(y[i, topK[i]], dtype=np.int32)
    keep = t.sum(axis=-1) > 0
    if not keep.any():
        return 0.0
    return average_precision_score(t[keep], s[keep], average='samples') * keep.sum() / n


def test_map_hand_computed():
    scores = np.array([[0.9, 0.1, 0.8, 0.3],     # top2 = classes 0 (true), 2 (false): AP 1
                       [0.2, 0.7, 0.6, 0.1],     # top2 = 1 (false), 2 (true): AP 1/2
                       [0.5, 0.4, 0.3, 0.2],     # top2 = 0, 1, no true label: dropped
                       [0.1, 0.2, 0.3, 0.4]])    # top2 = 3, 2, both true: AP 1
    labels = np.array([[1, 0, 0, 1], [1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]])
    assert map_at_k(scores, labels, k=2) == pytest.approx((1 + 0.5 + 1) / 4)
    # top 3 of video 2 = 1, 2, 0 -> false, true, true: AP = (1/2 + 2/3) / 2
    assert map_at_k(scores[1:2], labels[1:2], k=3) == pytest.approx((0.5 + 2 / 3) / 2)
    assert map_at_k(scores[2:3], labels[2:3], k=2) == 0.0


@pytest.mark.parametrize('seed', [0, 1])
def test_map_matches_original_formula(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((200, 30)).astype(np.float32)
    labels = (rng.random((200, 30)) < 0.08).astype(np.float32)
    expected = original_map(scores, labels, 10)
    assert 0 < expected < 1
    assert map_at_k(scores, labels, k=10) == pytest.approx(expected, rel=1e-12)
    # fewer classes than K: every class is a candidate
    assert map_at_k(scores[:, :6], labels[:, :6], k=10) == pytest.approx(original_map(scores[:, :6], labels[:, :6], 10))


def test_accumulated_metric_equals_one_shot():
    """Batches of different sizes (and empty ones) accumulated by the Ignite metric give the
    mAP of the whole split, per task and on average."""
    rng = np.random.default_rng(3)
    classes, sizes = [12, 5, 20], [37, 11, 50]
    logits = [torch.randn(n, c, generator=torch.Generator().manual_seed(t)) for t, (n, c) in enumerate(zip(sizes, classes))]
    labels = [torch.from_numpy((rng.random((n, c)) < 0.2).astype(np.float32)) for n, c in zip(sizes, classes)]
    steps = []
    cuts = [[0, 10, 20, 37], [0, 4, 11, 11], [0, 25, 26, 50]]     # task 1 has an empty last batch
    for s in range(3):
        steps.append(([z[cut[s]:cut[s + 1]] for z, cut in zip(logits, cuts)],
                      [y[cut[s]:cut[s + 1]] for y, cut in zip(labels, cuts)]))
    engine = Engine(lambda e, batch: batch)
    MultiTaskMAPAtK(3, k=10).attach(engine, 'mAP')
    metrics = engine.run(steps).metrics
    expected = [original_map(torch.sigmoid(z).numpy(), y.numpy(), 10) for z, y in zip(logits, labels)]
    assert metrics['task_mAP@10'] == pytest.approx(expected, rel=1e-10)
    assert metrics['mAP@10'] == pytest.approx(np.mean(expected), rel=1e-10)
    # a second run starts from zero
    assert engine.run(steps).metrics['mAP@10'] == pytest.approx(np.mean(expected), rel=1e-10)


def test_metric_rejects_task_without_videos():
    engine = Engine(lambda e, batch: batch)
    MultiTaskMAPAtK(2, k=10).attach(engine, 'mAP')
    step = ([torch.randn(4, 3), torch.zeros(0, 3)], [torch.ones(4, 3), torch.zeros(0, 3)])
    with pytest.raises(ValueError, match=r'task\(s\) \[1\]'):
        engine.run([step])


# ----------------------------------------------------------------------------------------
# flags and devices

def test_bool_flags():
    p = argparse.ArgumentParser()
    add_bool_argument(p, '--flag')
    add_bool_argument(p, '--other', default=True)
    assert p.parse_args([]).flag is False and p.parse_args([]).other is True
    assert p.parse_args(['--flag']).flag is True
    for word, value in [('True', True), ('false', False), ('1', True), ('0', False), ('YES', True), ('no', False)]:
        assert p.parse_args(['--flag', word]).flag is value
    with pytest.raises(SystemExit):
        p.parse_args(['--flag', 'maybe'])
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool('2')


def test_split_glued_booleans():
    names = {'--mrn_constant', '--flag'}
    argv = ['--flag', 'False--mrn_constant', '1e-3', 'x--mrn_constant', 'True--unknown']
    assert split_glued_booleans(argv, names) == ['--flag', 'False', '--mrn_constant', '1e-3',
                                                 'x--mrn_constant', 'True--unknown']


def test_resolve_device():
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('CPU', gpu='0') == torch.device('cpu')
    with pytest.raises(ValueError, match='unknown device'):
        resolve_device('tpu')
    if torch.cuda.is_available():
        assert resolve_device('auto') == torch.device('cuda', 0)
        assert resolve_device('auto', gpu='0') == torch.device('cuda', 0)
        with pytest.raises(ValueError, match='does not exist'):
            resolve_device('cuda:99')
    else:
        assert resolve_device('auto') == torch.device('cpu')
        assert resolve_device('auto', gpu='1') == torch.device('cpu')
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda:0')


def test_count_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2


# ----------------------------------------------------------------------------------------
# checkpoints

def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    state = RNGState()
    path = tmp_path / 'rng.pt'
    torch.save({'rng': state.state_dict()}, path)
    first = (torch.rand(3), np.random.rand(3), __import__('random').random())
    torch.manual_seed(99)
    np.random.seed(99)
    load_checkpoint(path, {'rng': state})
    again = (torch.rand(3), np.random.rand(3), __import__('random').random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def run_with_scores(scores, dirname, model, objects):
    """An evaluator whose metric takes the values `scores`, one per trainer epoch, with
    the best-model and training-state checkpoints attached."""
    evaluator = Engine(lambda e, b: None)
    trainer = objects['trainer']

    @evaluator.on(Events.COMPLETED)
    def score(engine):
        engine.state.metrics['score'] = scores[trainer.state.epoch - 1]
        with torch.no_grad():
            model.weight.fill_(trainer.state.epoch)

    best, state = make_checkpoints(dirname, model, objects, 'best.pth', 'state.pt',
                                   lambda e: e.state.metrics['score'])
    evaluator.add_event_handler(Events.COMPLETED, best)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, state)
    trainer.run([0, 0], max_epochs=len(scores))
    return best, state


def test_best_and_state_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 1)
    trainer = Engine(lambda e, b: None)
    objects = {'model': model, 'trainer': trainer}
    run_with_scores([0.2, 0.5, 0.4, 0.5], tmp_path, model, objects)
    assert sorted(os.listdir(tmp_path)) == ['best.pth', 'state.pt']         # no temporary files left
    best = read_checkpoint(tmp_path / 'best.pth')
    assert torch.all(best['weight'] == 2)          # epoch 2 had the best score (0.5 later is not better)
    state = read_checkpoint(tmp_path / 'state.pt')
    assert torch.all(state['model']['weight'] == 4) and state['trainer']['iteration'] == 8
    assert state['best_checkpoint']['_saved'][0][0] == 0.5
    # restoring the state into fresh objects
    model2, trainer2 = torch.nn.Linear(2, 1), Engine(lambda e, b: None)
    load_checkpoint(tmp_path / 'state.pt', {'model': model2, 'trainer': trainer2})
    assert torch.all(model2.weight == 4) and trainer2.state.epoch == 4


def test_corrupt_and_foreign_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 1)
    good = tmp_path / 'good.pt'
    torch.save({'model': model.state_dict(), 'trainer': {'epoch_length': 1, 'iteration': 1, 'max_epochs': 1}}, good)
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=r'truncated\.pt is truncated or corrupt.*Delete it'):
        load_checkpoint(truncated, {'model': model})
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='garbage.pt'):
        read_checkpoint(garbage)
    with pytest.raises(CheckpointError, match='lacks optimizer'):
        load_checkpoint(good, {'model': model, 'optimizer': torch.optim.SGD(model.parameters(), lr=0.1)})
    with pytest.raises(CheckpointError, match='does not fit'):
        load_checkpoint(good, {'model': torch.nn.Linear(3, 1), 'trainer': Engine(lambda e, b: None)})
    with pytest.raises(UserError):
        read_checkpoint(tmp_path / 'missing.pt')


def test_resolve_resume(tmp_path):
    state = tmp_path / 'state.pt'
    assert resolve_resume('', str(state)) is None
    assert resolve_resume('auto', str(state)) is None            # nothing saved yet: start afresh
    state.write_bytes(b'x')
    assert resolve_resume('auto', str(state)) == str(state)
    assert resolve_resume(str(state), None) == str(state)
    with pytest.raises(UserError, match='no such checkpoint'):
        resolve_resume(str(tmp_path / 'other.pt'), None)
    with pytest.raises(ValueError, match='--saveto'):
        resolve_resume('auto', None)


def test_atomic_savetxt(tmp_path):
    path = tmp_path / 'sub' / 'values%K.txt'
    atomic_savetxt(path, [0.25, 0.5])
    atomic_savetxt(tmp_path / 'mean.txt', 0.375)
    assert np.loadtxt(path).tolist() == [0.25, 0.5]
    assert float(np.loadtxt(tmp_path / 'mean.txt')) == 0.375
    assert os.listdir(path.parent) == ['values%K.txt']


def flip_byte_in_tensor_data(path):
    """Flip one bit inside the stored data of the first tensor of a torch.save file, as a
    damaged disk or copy would: torch.load alone reads the wrong weight without a word."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if '/data/' in i.filename and i.file_size >= 16)
    raw = bytearray(open(path, 'rb').read())
    name_length, extra_length = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], 'little'), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')
    raw[info.header_offset + 30 + name_length + extra_length + 3] ^= 0x40
    open(path, 'wb').write(bytes(raw))


def test_flipped_byte_is_found_before_loading(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = tmp_path / 'model.pt'
    torch.save(model.state_dict(), path)
    assert torch.equal(read_checkpoint(path)['weight'], model.weight)
    flip_byte_in_tensor_data(path)
    assert not torch.equal(torch.load(path, weights_only=True)['weight'], model.weight)    # silently wrong
    with pytest.raises(CheckpointError, match=r'model\.pt is damaged \(the data of .*/data/0 fails its checksum\)'):
        read_checkpoint(path)


@pytest.mark.parametrize('k', [1, 3, 10])
def test_average_precision_rows_equals_sklearn_with_ties(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(300, k)).astype(np.float32) / 4       # many tied scores
    scores[::7] = rng.random((len(scores[::7]), k))
    labels = (rng.random((300, k)) < 0.4).astype(np.int32)
    labels[labels.sum(1) == 0, 0] = 1
    from Training.metrics import average_precision_rows
    expected = [average_precision_score(y, s) for y, s in zip(labels, scores)] if k > 1 else [1.0] * 300
    np.testing.assert_allclose(average_precision_rows(labels, scores), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize('command, flag', [('Omniglot.reproduce', '--results_dir'), ('Youtube8M.reproduce', '--out')])
def test_a_reproduction_folder_has_one_live_run(command, flag, youtube8m_data, tmp_path):
    """Both sweep commands own their output folder while they run, as a training run owns --saveto
    (tests/test_youtube8m_trainer.py): a second one into it stops in one line before any work."""
    import importlib
    from Training import hold_folder
    folder = str(tmp_path / 'out')
    argv = [flag, folder] + (['--data_path', youtube8m_data] if command.startswith('Youtube8M') else [])
    with hold_folder(folder, 'the test'):
        with pytest.raises(UserError, match=rf'^{flag} {folder} is in use by another run \(process {os.getpid()}\)'):
            importlib.import_module(command).main(argv)
    assert os.listdir(folder) == ['.lock']         # refused before writing anything
