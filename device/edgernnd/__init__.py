"""edgernnd: the on-device daemon that runs a stateful recurrent step model.

The device half of edgernn imports only the standard library, numpy, pyserial,
``tflite_runtime`` (or ``ai_edge_litert``) and, when MQTT is configured, paho-mqtt.
It never imports TensorFlow or Keras.
"""

__version__ = "0.1.0"
