"""Default element names and physical constants of the histocell-sd data model."""

COORDINATE_SYSTEM = "global"  # full-resolution pixels of the H&E
MICRON_SYSTEM = "um"  # the same in µm: Scale(mpp) after the element's global transformation
SPATIAL_UM_KEY = "spatial_um"  # obsm: centres in µm (squidpy: spatial_key="spatial_um")
IMAGE_KEY = "he"
SPOTS_KEY = "spots"
TABLE_KEY = "table"
NUCLEI_KEY = "nuclei"
HISTOCELL_KEY = "histocell"
PROPORTIONS_KEY = "proportions"

REGION_KEY = "region"
SPOT_ID_KEY = "spot_id"
NUCLEUS_ID_KEY = "nucleus_id"

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_PITCH_UM = 100.0

# Prediction layout of the nuclei table (``tables["histocell"]``), written by ``tl.predict``.
CELL_TYPE_KEY = "cell_type"  # obs, categorical
CELL_TYPE_PROBA_KEY = "cell_type_proba"  # obsm, DataFrame (columns = cell types)
CELL_STATE_KEY = "cell_state"  # obs, categorical
CELL_STATE_PROBA_KEY = "cell_state_proba"  # obsm, DataFrame (columns = states)
COMPARTMENT_KEY = "compartment"  # obs, categorical
ENTROPY_KEY = "cell_type_entropy"  # obs, float (nats)
REFINED_TYPE_KEY = "refined_cell_type"  # obs, categorical (tl.refine_deconvolution)
EMBEDDING_KEY = "histocell_embedding"  # obsm, float32 array
SPATIAL_KEY = "spatial"  # obsm, px centroids (x, y)

PREDICTED_PROPORTIONS_KEY = "histocell_proportions"  # spots table obsm, DataFrame
STATE_PROPORTIONS_KEY = "state_proportions"  # spots table obsm, DataFrame (columns = states)

# Colours of categories (cell types, states, compartments) in the order of the model's labels: bright and
# saturated so they stay visible over hematoxylin (purple) and eosin (pink); stored as uns["<key>_colors"]
# (the scanpy convention spatialdata-plot and squidpy read). No blue: it vanishes on hematoxylin-stained nuclei.
PALETTE = (
    "#ffe119", "#00e5ff", "#3cb44b", "#ff7f00", "#ff1f1f", "#b8ff2e", "#ffffff", "#000000",
    "#8b4513", "#00a087", "#ffb3c7", "#7f7f7f",
)  # fmt: skip

NUCLEI_OBS_LAYOUT = frozenset({CELL_TYPE_KEY, CELL_STATE_KEY, COMPARTMENT_KEY, ENTROPY_KEY, REFINED_TYPE_KEY, SPOT_ID_KEY, NUCLEUS_ID_KEY, REGION_KEY})
"""The nuclei table's ``obs`` columns the data model defines: no ``key_added`` may overwrite them."""

SPOTS_OBSM_LAYOUT = frozenset({SPATIAL_KEY, SPATIAL_UM_KEY, STATE_PROPORTIONS_KEY, PREDICTED_PROPORTIONS_KEY})
"""Spots-table ``obsm`` keys the data layout defines: no ``key_added`` may name them."""
