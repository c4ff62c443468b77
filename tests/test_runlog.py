"""Training.runlog: metrics.csv, TensorBoard events and learning_curves.png of a run folder."""
import math
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from Training.runlog import CURVES_NAME, METRICS_NAME, RunLog, metric_columns, read_metrics


def read_events(folder):
    """{(tag, step): value} that TensorBoard shows for `folder`: every event file in the order written,
    with a purge (a SessionLog START at step s) dropping the steps >= s logged before it."""
    scalars = {}
    for name in sorted(f for f in os.listdir(folder) if f.startswith('events.out.tfevents.')):
        with open(os.path.join(folder, name), 'rb') as f:
            data = f.read()
        at = 0
        while at < len(data):       # TFRecord: length, crc of length, payload, crc of payload
            (length,) = struct.unpack('<Q', data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField('session_log') and event.session_log.status == event.session_log.START:
                scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_metric_columns_name_every_number():
    columns = metric_columns('valid', {'mAP': 0.5, 'task_mAP': [0.25, 0.75], 'detail': {'x': 1}}, ['a', 'b'])
    assert columns == {'valid_mAP': 0.5, 'valid_task_mAP/a': 0.25, 'valid_task_mAP/b': 0.75}
    assert metric_columns('test', {'acc': [1, 0]}) == {'test_acc/0': 1.0, 'test_acc/1': 0.0}


def test_rows_reach_csv_and_tensorboard_and_a_resume_holds_no_row_twice(tmp_path, real_curves):
    folder = str(tmp_path)
    log = RunLog(folder, 'valid_mAP')
    log.add(1, 10, None, {'valid_mAP': 0.25})
    log.add(2, 20, 1.5, {'valid_mAP': 0.5})
    saved = log.state_dict()
    log.add(3, 30, 1.25, {'valid_mAP': 0.625})      # logged, then the run is killed before saving it
    log.close()

    resumed = RunLog(folder, 'valid_mAP')
    resumed.load_state_dict(saved)
    resumed.add(3, 30, 1.0, {'valid_mAP': 0.75})
    resumed.close()
    resumed.draw()
    rows = read_metrics(os.path.join(folder, METRICS_NAME))
    assert [r['iteration'] for r in rows] == [10, 20, 30]
    assert [r['valid_mAP'] for r in rows] == [0.25, 0.5, 0.75]
    assert math.isnan(rows[0]['train_loss']) and rows[1:][0]['train_loss'] == 1.5
    assert [r['seconds'] for r in rows] == sorted(r['seconds'] for r in rows)
    with open(os.path.join(folder, METRICS_NAME)) as f:
        assert f.readline().strip() == 'epoch,iteration,train_loss,valid_mAP,seconds'
    assert read_events(folder) == {('valid/mAP', 10): 0.25, ('train/loss', 20): 1.5, ('valid/mAP', 20): 0.5,
                                   ('train/loss', 30): 1.0, ('valid/mAP', 30): 0.75}
    assert os.path.getsize(os.path.join(folder, CURVES_NAME)) > 1000


def test_a_fresh_run_purges_what_an_earlier_run_left_in_its_folder(tmp_path):
    for value in (0.125, 0.875):
        log = RunLog(str(tmp_path), 'valid_mAP')
        log.add(1, 5, 2.0, {'valid_mAP': value})
        log.close()
    assert read_events(str(tmp_path)) == {('train/loss', 5): 2.0, ('valid/mAP', 5): 0.875}


def test_without_a_folder_or_on_other_processes_nothing_is_written(tmp_path):
    for log in (RunLog(None, 's'), RunLog(str(tmp_path), 's', write=False)):
        assert log.add(1, 1, 0.5, {'s': 1.0})['s'] == 1.0
        log.close()
        log.draw()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('value', [0.1, 1 / 3])
def test_csv_keeps_full_precision(tmp_path, value):
    log = RunLog(str(tmp_path), 's', tensorboard=False)
    log.add(1, 1, value, {'s': value})
    assert read_metrics(os.path.join(str(tmp_path), METRICS_NAME))[0]['s'] == value
