"""Default element names and physical constants of the histocell-sd data model."""

COORDINATE_SYSTEM = "global"
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
